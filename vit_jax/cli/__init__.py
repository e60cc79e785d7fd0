"""What the programs share: one flag vocabulary, one way to fail, quiet logs.

Every program (`python -m vit_jax.{main,export,predict,inspect,evaluate,
plan}`, or the `vit-*` console scripts) names a model the same way:

  --model=PATH     a training workdir, an export (folder or card) or an .npz
  --step=N         a workdir's checkpoint (default: the newest readable)
  --model_name=X   the architecture of an .npz (e.g. ViT-B_16); with it
                   --num_classes, --eval_resize, --model_overrides
  --image_size=H or H,W   another resolution (position embedding resized)
  --labels=FILE    label names, one per line (or index<TAB>id<TAB>name)
  --output=PATH    what the program writes
  images as positional arguments (files and folders)

Exit statuses: 0 done; 1 the work ran but some inputs failed (named on
stderr), or a runtime error explained in one `error:` line; 2 a usage error
(bad flag, model, labels, config), one `error:` line before any work; 75 a
preempted training run (resume with the same command); 130 Ctrl-C.
"""
from collections.abc import Callable
import logging as std_logging
import os
import sys
import traceback
from typing import Any, NoReturn

from absl import app
from absl import flags
from absl import logging

from vit_jax.cli import accelerators
from vit_jax.cli import host_memory

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class UsageError(Exception):
  """Bad usage detected by a program: one `error:` line, exit status 2."""


def usage_error(message: str) -> NoReturn:
  """One `error:` line and exit status 2, the programs' usage-error convention."""
  sys.stderr.write(f'error: {message}\nPass --help for usage.\n')
  sys.exit(EXIT_USAGE)


def fail(message: str, status: int = EXIT_FAILED) -> NoReturn:
  sys.stderr.write(f'error: {message}\n')
  sys.exit(status)


_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def parse_flags(argv: list[str],
                explain: Callable[[Exception], str] = str) -> list[str]:
  """absl's parser, but a bad flag is a usage error (exit status 2, the
  message from `explain`) and --help, which absl ends with status 1, exits 0.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:  # + ml_collections'
    usage_error(explain(e))
  except SystemExit as e:
    if e.code == 1 and any(a in _HELP for a in argv[1:]):
      sys.exit(0)
    raise


class _QuietLibraries(std_logging.Filter):
  """JAX's backend probing, Orbax, TFDS and matplotlib (its font cache, built
  on a machine's first run): drops INFO chatter (dozens of lines per save), and cuts
  their error tracebacks to the first line, since our errors name the reason.
  asyncio's "Task exception was never retrieved" for Orbax's tasks, logged at
  exit after a failed save, only repeats that error: dropped. So is Orbax's
  "Waiting for previous save", repeated at every slow save: StateCheckpointer
  says it once, in our words."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False
    if ('/orbax/' in record.pathname
        and 'Waiting for previous save' in str(record.msg)):
      return False
    if (record.name == 'jax._src.xla_bridge'
        and record.levelno < std_logging.WARNING):
      return False  # "Unable to initialize backend 'tpu'" on every CPU run
    if not any(lib in record.pathname for lib in
               ('/orbax/', '/tensorflow_datasets/', '/etils/',
                '/matplotlib/')):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    record.msg = record.getMessage().splitlines()[0][:300]
    record.args, record.exc_info, record.exc_text = None, None, None
    return True


def quiet_environment() -> None:
  """Before TensorFlow or XLA start: their C++ INFO start-up lines stay unsaid
  (TensorFlow's oneDNN and CPU-feature notices); warnings still show. A
  user's own setting wins.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')


def _quiet_closed_loop_callbacks() -> None:
  """After a failed checkpoint write (a full disk), Orbax's worker threads keep
  calling back into its closed event loop; each `RuntimeError: Event loop is
  closed` reached sys.unraisablehook and was printed as a traceback (119
  before our one error line). Only those are dropped: raised by asyncio's
  closed-loop check inside call_soon_threadsafe."""
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if (isinstance(value, RuntimeError)
        and str(value) == 'Event loop is closed' and frames
        and frames[0].name == 'call_soon_threadsafe'
        and frames[0].filename.endswith(os.path.join('asyncio',
                                                     'base_events.py'))):
      return
    previous(unraisable)

  sys.unraisablehook = hook


def run(main: Callable[[list[str]], Any],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
  """Runs a program's `main(argv)`: flags parsed (errors exit 2), quiet logs,
  a UsageError raised by `main` reported as one line with exit status 2."""
  quiet_environment()
  accelerators.cpu_only_platforms()  # before host_memory reads JAX_PLATFORMS
  host_memory.keep_freed_memory()
  program = sys.modules[main.__module__]
  if sys.modules['__main__'] is not program:
    # A console script (vit-train, ...): absl's --help shows the docstring
    # and key flags of __main__, here the script's wrapper: lend it ours.
    sys.modules['__main__'].__doc__ = program.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(program.__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def wrapped(argv: list[str]) -> Any:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _quiet_closed_loop_callbacks()
    try:
      return main(argv)
    except UsageError as e:
      usage_error(str(e))
    except KeyboardInterrupt:
      fail('interrupted (Ctrl-C).', EXIT_INTERRUPTED)

  app.run(wrapped, flags_parser=flags_parser)


# ---- the shared flags --------------------------------------------------------

def define_model_flags(*, step: bool = True) -> None:
  """--model and what qualifies it (module docstring)."""
  flags.DEFINE_string('model', None, 'Training workdir, export (folder or '
                      '.card.json) or .npz.')
  if step:
    flags.DEFINE_integer('step', None, 'With a workdir: the checkpoint step '
                         '(default: the newest readable).')
  flags.DEFINE_string('model_name', None, 'With an .npz: its architecture, '
                      'e.g. ViT-B_16.')
  flags.DEFINE_integer('num_classes', None, 'With an .npz: expected classes '
                       '(checked against its head).')
  flags.DEFINE_enum('eval_resize', None, ['resize', 'resize_crop'],
                    'With an .npz: its eval preprocessing (default resize).')
  flags.DEFINE_list('model_overrides', [], 'With an .npz: model fields as '
                    'key=value, e.g. num_heads=3.')


def define_image_size_flag() -> None:
  flags.DEFINE_string('image_size', None, 'H or H,W: run at this resolution '
                      '(default: the model\'s own; another resizes the '
                      'position embedding).')


def define_labels_flag() -> None:
  flags.DEFINE_string('labels', None, 'Label names file: one per line, or '
                      'index<TAB>id<TAB>name (as ImageNet\'s TSV).')


def define_output_flag(what: str) -> None:
  flags.DEFINE_string('output', None, what)


def output_folder() -> str | None:
  """--output, checked before any work: UsageError if it names a file."""
  out = flags.FLAGS.output
  if out and os.path.exists(out) and not os.path.isdir(out):
    raise UsageError(f'--output={out} is a file; name a folder (it is '
                     'created if missing).')
  return out


def image_size() -> tuple[int, int] | None:
  """--image_size as (height, width), or None; UsageError if malformed."""
  text = flags.FLAGS.image_size
  if not text:
    return None
  try:
    size = [int(part) for part in text.split(',')]
  except ValueError:
    size = []
  if len(size) not in (1, 2) or min(size) < 1:
    raise UsageError(f'--image_size={text}: give H or H,W in pixels, e.g. '
                     '224 or 224,320.')
  return (size * 2)[:2]


def require(*names: str) -> None:
  """UsageError naming each required flag that was not given."""
  missing = [f'--{n}' for n in names if flags.FLAGS[n].value in (None, '')]
  if missing:
    raise UsageError(f'{", ".join(missing)} {"is" if len(missing) == 1 else "are"}'
                     ' required.')


def load_model_source(**extra: Any):
  """The `sources.Source` that the model flags name; UsageError if they cannot.

  Imports the model code (Flax); programs that run exports alone do not
  call it.
  """
  from vit_jax import sources  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  overrides = None
  if f.model_overrides:
    from vit_jax.sources import npz  # pylint: disable=g-import-not-at-top
    try:
      overrides = npz.parse_overrides(f.model_overrides)
    except ValueError as e:
      raise UsageError(f'--model_overrides: {e}') from None
  try:
    return sources.load(
        f.model, model_name=f.model_name,
        step=f.step if 'step' in f else None, image_size=image_size(),
        labels=f.labels if 'labels' in f else None,
        num_classes=f.num_classes, resize=f.eval_resize, overrides=overrides,
        **extra)
  except (ValueError, OSError) as e:
    raise UsageError(_one_line(e)) from None


def load_classifier_source():
  """`load_model_source`, refusing a model without a classifier head."""
  from vit_jax import sources  # pylint: disable=g-import-not-at-top
  source = load_model_source()
  try:
    sources.check_classifier(source)
  except ValueError as e:
    raise UsageError(str(e)) from None
  return source


def _one_line(error: Exception) -> str:
  if isinstance(error, FileNotFoundError) and error.filename:
    return f'{error.filename}: no such file or directory.'
  return str(error)


def load_classifier():
  """The model flags as a `serving.classifier.Classifier`: an export with a
  StableHLO function runs it without importing the model code (Flax);
  anything else is a `sources.Source` run with it."""
  from vit_jax.serving import card as card_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.serving import classifier  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.model and card_lib.is_export(f.model):
    try:
      card_path, card = card_lib.read_card(f.model)
      if card['files'].get('stablehlo'):
        takes_nothing = [name for name in ('step', 'model_name', 'num_classes',
                                           'eval_resize', 'image_size')
                         if name in f and f[name].value is not None]
        if takes_nothing or f.model_overrides:
          raise UsageError(
              f'--{", --".join(takes_nothing or ["model_overrides"])} '
              f'{"does" if len(takes_nothing) <= 1 else "do"} not apply to '
              f'--model={f.model}, an export: it fixes its model, weights '
              'and resolution.')
        result = classifier.from_export(card_path)
        return (classifier.with_labels(result, f.labels) if f.labels
                else result)
    except (ValueError, OSError) as e:
      raise UsageError(_one_line(e)) from None
  from vit_jax import sources  # pylint: disable=g-import-not-at-top
  return sources.classifier(load_classifier_source())

