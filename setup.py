"""vit_jax: Vision Transformer models, training and export in JAX/Flax."""
import setuptools

setuptools.setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (arXiv 2010.11929) in JAX/Flax linen: models, '
                'official checkpoints, training, fine-tuning and export.',
    packages=setuptools.find_packages(include=['vit_jax', 'vit_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.7',
        'flax>=0.11',
        'optax>=0.2.5',
        'orbax-checkpoint>=0.11',
        'ml-collections>=1.0',
        'numpy>=1.26',
        'absl-py',
        'safetensors>=0.4',  # export format
        'pillow>=10',  # image decoding in predict / inspect (no TensorFlow)
        'matplotlib>=3.8',  # inspection figures
        'tensorboard>=2.16',  # training summaries
        'tensorflow-datasets>=4.9.8',
        # tf.data only (input pipelines): the CPU build never takes GPU memory.
        "tensorflow-cpu>=2.18; platform_system == 'Linux' or platform_system == 'Windows'",
        "tensorflow>=2.18; platform_system == 'Darwin'",
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist>=3', 'scipy>=1.11'],
    },
)
