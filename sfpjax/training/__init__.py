"""Training with Optax: data sources, configuration and optimizer, losses and evaluation, the step, the loop, Orbax checkpoints."""

from ._data import ArraySource as ArraySource
from ._data import ProcessSource as ProcessSource
from ._data import as_source as as_source
from ._protocol import ModelConfig as ModelConfig
from ._protocol import SequenceModel as SequenceModel
from ._config import TrainConfig as TrainConfig
from ._config import make_optimizer as make_optimizer
from ._config import make_schedule as make_schedule
from ._loss import EvalResult as EvalResult
from ._loss import evaluate as evaluate
from ._loss import loss_floor as loss_floor
from ._loss import next_token_loss as next_token_loss
from ._loss import per_position_loss as per_position_loss
from ._step import TrainStep as TrainStep
from ._step import init_opt_state as init_opt_state
from ._step import make_step as make_step
from ._loop import TrainResult as TrainResult
from ._loop import train as train
from ._loop import train_stack as train_stack
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import restore_checkpoint as restore_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
