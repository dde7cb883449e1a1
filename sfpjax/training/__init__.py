"""Training with Optax: data sources, configuration, losses and evaluation, the step and the loop, Orbax checkpoints."""

from ._data import ArraySource as ArraySource
from ._data import ProcessSource as ProcessSource
from ._data import as_source as as_source
from ._train import EvalResult as EvalResult
from ._train import TrainConfig as TrainConfig
from ._train import TrainResult as TrainResult
from ._train import evaluate as evaluate
from ._train import init_opt_state as init_opt_state
from ._train import loss_floor as loss_floor
from ._train import make_optimizer as make_optimizer
from ._train import make_schedule as make_schedule
from ._train import make_step as make_step
from ._train import next_token_loss as next_token_loss
from ._train import per_position_loss as per_position_loss
from ._train import train as train
from ._train import train_stack as train_stack
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import restore_checkpoint as restore_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
from ._persona_data import persona_sequences as persona_sequences
