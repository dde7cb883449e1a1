"""sfpjax: generalized hidden Markov processes, exact belief states and small transformers in JAX.

Plotting lives in ``sfpjax.plots`` (imported on demand, so ``import sfpjax`` does not load
matplotlib).
"""

# Processes
from ._ghmm import GHMM as GHMM
from ._ghmm import is_hmm as is_hmm
from ._ghmm import stationary_state as stationary_state
from ._ghmm import validate_ghmm as validate_ghmm
from ._zoo import coin as coin
from ._zoo import even_process as even_process
from ._zoo import golden_mean as golden_mean
from ._zoo import mess3 as mess3
from ._zoo import noisy_and as noisy_and
from ._zoo import noisy_not as noisy_not
from ._zoo import partitioned_z1r as partitioned_z1r
from ._zoo import post_quantum as post_quantum
from ._zoo import rrxor as rrxor
from ._zoo import tom_quantum as tom_quantum
from ._zoo import z1r as z1r
from ._compose import SemiFactoredProcess as SemiFactoredProcess
from ._compose import decode_tokens as decode_tokens
from ._compose import direct_sum as direct_sum
from ._compose import encode_tokens as encode_tokens
from ._compose import is_partition_preserving as is_partition_preserving
from ._compose import partition_leakage as partition_leakage
from ._compose import partitioned_z1r_sfp as partitioned_z1r_sfp
from ._compose import product as product
from ._compose import semi_factored as semi_factored
from ._compose import with_token_noise as with_token_noise
from ._structure import density_matrix as density_matrix
from ._structure import factor_marginals as factor_marginals
from ._structure import factor_mutual_information as factor_mutual_information
from ._structure import is_product_state as is_product_state
from ._structure import nearest_product_state as nearest_product_state
from ._structure import partial_trace as partial_trace
from ._structure import sector_weights as sector_weights
# Exact inference
from ._beliefs import FilterResult as FilterResult
from ._beliefs import belief_update as belief_update
from ._beliefs import beliefs_with_initial as beliefs_with_initial
from ._beliefs import filter_beliefs as filter_beliefs
from ._beliefs import next_token_probs as next_token_probs
from ._beliefs import sequence_log_prob as sequence_log_prob
from ._mixed_state import MixedStatePresentation as MixedStatePresentation
from ._mixed_state import belief_spread as belief_spread
from ._mixed_state import entropy_rate as entropy_rate
from ._mixed_state import mixed_state_presentation as mixed_state_presentation
from ._mixed_state import myopic_entropies as myopic_entropies
from ._mixed_state import num_distinct_beliefs as num_distinct_beliefs
from ._mixed_state import word_beliefs as word_beliefs
from ._sampling import sample as sample
# Model
from ._model import Transformer as Transformer
from ._model import TransformerBlock as TransformerBlock
from ._model import TransformerConfig as TransformerConfig
from ._interventions import Intervention as Intervention
# Training
from ._data import ArraySource as ArraySource
from ._data import ProcessSource as ProcessSource
from ._data import as_source as as_source
from ._training import EvalResult as EvalResult
from ._training import TrainConfig as TrainConfig
from ._training import TrainResult as TrainResult
from ._training import evaluate as evaluate
from ._training import init_opt_state as init_opt_state
from ._training import loss_floor as loss_floor
from ._training import make_optimizer as make_optimizer
from ._training import make_schedule as make_schedule
from ._training import make_step as make_step
from ._training import next_token_loss as next_token_loss
from ._training import per_position_loss as per_position_loss
from ._training import train as train
from ._training import train_stack as train_stack
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import CheckpointError as CheckpointError
from ._checkpoint import latest_checkpoint as latest_checkpoint
from ._checkpoint import restore_checkpoint as restore_checkpoint
from ._checkpoint import save_checkpoint as save_checkpoint
# Probes and geometry
from ._probes import LinearProbe as LinearProbe
from ._probes import ProbeMetrics as ProbeMetrics
from ._probes import belief_centroids as belief_centroids
from ._probes import concat_sites as concat_sites
from ._probes import evaluate_probe as evaluate_probe
from ._probes import fit_factor_probes as fit_factor_probes
from ._probes import fit_probe as fit_probe
from ._probes import probe_inverse as probe_inverse
from ._probes import probe_r2 as probe_r2
from ._probes import probe_rmse as probe_rmse
from ._probes import train_test_split as train_test_split
from ._geometry import SubspaceAngles as SubspaceAngles
from ._geometry import n_components_for_variance as n_components_for_variance
from ._geometry import pca_explained_variance as pca_explained_variance
from ._geometry import subspace_angles as subspace_angles
# Steering
from ._steering import FactorCentroids as FactorCentroids
from ._steering import ablate_direction as ablate_direction
from ._steering import add_vector as add_vector
from ._steering import belief_state_delta as belief_state_delta
from ._steering import centroid_vector as centroid_vector
from ._steering import difference_in_means as difference_in_means
from ._steering import factor_centroids as factor_centroids
from ._steering import label_means as label_means
from ._steering import position_mask_at as position_mask_at
from ._steering import set_projection as set_projection
from ._steering import steer_ablate as steer_ablate
from ._steering import steer_add as steer_add
from ._steering import steer_set_projection as steer_set_projection
from ._steering import steering_sweep as steering_sweep
from ._steering_metrics import SteeringKLs as SteeringKLs
from ._steering_metrics import SteeringSweep as SteeringSweep
from ._steering_metrics import evaluate_steering as evaluate_steering
from ._steering_metrics import factor_token_marginals as factor_token_marginals
from ._steering_metrics import kl_divergence as kl_divergence
from ._steering_metrics import sector_token_classes as sector_token_classes
from ._steering_metrics import specificity_ratio as specificity_ratio
from ._steering_metrics import steering_kls as steering_kls
from ._steering_metrics import token_class_masses as token_class_masses
# Sweeps
from ._sweep import Grid as Grid
from ._sweep import SweepResult as SweepResult
from ._sweep import grid as grid
from ._sweep import load_sweep as load_sweep
from ._sweep import points as points
from ._sweep import run_sweep as run_sweep
