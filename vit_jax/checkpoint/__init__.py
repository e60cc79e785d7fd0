"""Model weights in files: read and write every published layout, adapt them.

Imports numpy (and jax for bicubic resizing), never Flax, TensorFlow or
Orbax: weights are flat or nested dicts of numpy arrays under Google's names.

    params = checkpoint.load_npz('ViT-B_16.npz')
    params = checkpoint.load_pretrained('ViT-B_16.npz', fresh_params, model)
    checkpoint.save_npz('out.npz', params)

`npz`: Google's, big_vision's and our `.npz` files; `layout`: their key
layouts; `adapt`: fitting weights to a new head, grid or block layout;
`posemb`: position-embedding resizing; `arrays`: flat dicts and the checks
every loaded array passes (floating point, finite); `weight_files`: the one
reader of .npz and .safetensors files, bounded, that applies them.
"""
from vit_jax.checkpoint.adapt import ADAPTATIONS
from vit_jax.checkpoint.adapt import load_pretrained
from vit_jax.checkpoint.npz import load_npz
from vit_jax.checkpoint.npz import save_npz
from vit_jax.checkpoint.posemb import interpolate_posemb

__all__ = ['ADAPTATIONS', 'interpolate_posemb', 'load_npz', 'load_pretrained',
           'save_npz']
