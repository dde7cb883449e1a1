"""sfpjax: generalized hidden Markov processes, exact belief states and small transformers in JAX.

Plotting lives in ``sfpjax.plots`` (imported on demand, so ``import sfpjax`` does not load
matplotlib).
"""

# Processes
from .processes import GHMM as GHMM
from .processes import is_hmm as is_hmm
from .processes import stationary_state as stationary_state
from .processes import validate_ghmm as validate_ghmm
from .processes import coin as coin
from .processes import even_process as even_process
from .processes import golden_mean as golden_mean
from .processes import mess3 as mess3
from .processes import noisy_and as noisy_and
from .processes import noisy_not as noisy_not
from .processes import partitioned_z1r as partitioned_z1r
from .processes import post_quantum as post_quantum
from .processes import rrxor as rrxor
from .processes import tom_quantum as tom_quantum
from .processes import z1r as z1r
from .processes import SemiFactoredProcess as SemiFactoredProcess
from .processes import decode_tokens as decode_tokens
from .processes import direct_sum as direct_sum
from .processes import encode_tokens as encode_tokens
from .processes import is_partition_preserving as is_partition_preserving
from .processes import partition_leakage as partition_leakage
from .processes import partitioned_z1r_sfp as partitioned_z1r_sfp
from .processes import product as product
from .processes import semi_factored as semi_factored
from .processes import with_token_noise as with_token_noise
from .processes import density_matrix as density_matrix
from .processes import factor_marginals as factor_marginals
from .processes import factor_mutual_information as factor_mutual_information
from .processes import is_product_state as is_product_state
from .processes import nearest_product_state as nearest_product_state
from .processes import partial_trace as partial_trace
from .processes import sector_weights as sector_weights
# Exact inference
from .inference import FilterResult as FilterResult
from .inference import belief_update as belief_update
from .inference import beliefs_with_initial as beliefs_with_initial
from .inference import filter_beliefs as filter_beliefs
from .inference import next_token_probs as next_token_probs
from .inference import sequence_log_prob as sequence_log_prob
from .inference import MixedStatePresentation as MixedStatePresentation
from .inference import belief_spread as belief_spread
from .inference import entropy_rate as entropy_rate
from .inference import mixed_state_presentation as mixed_state_presentation
from .inference import myopic_entropies as myopic_entropies
from .inference import num_distinct_beliefs as num_distinct_beliefs
from .inference import word_beliefs as word_beliefs
from .inference import sample as sample
# Model
from .model import Transformer as Transformer
from .model import TransformerBlock as TransformerBlock
from .model import TransformerConfig as TransformerConfig
from .model import Intervention as Intervention
# Training
from .training import ArraySource as ArraySource
from .training import ProcessSource as ProcessSource
from .training import as_source as as_source
from .training import EvalResult as EvalResult
from .training import TrainConfig as TrainConfig
from .training import TrainResult as TrainResult
from .training import evaluate as evaluate
from .training import init_opt_state as init_opt_state
from .training import loss_floor as loss_floor
from .training import make_optimizer as make_optimizer
from .training import make_schedule as make_schedule
from .training import make_step as make_step
from .training import next_token_loss as next_token_loss
from .training import per_position_loss as per_position_loss
from .training import train as train
from .training import train_stack as train_stack
from .training import Checkpoint as Checkpoint
from .training import CheckpointError as CheckpointError
from .training import latest_checkpoint as latest_checkpoint
from .training import restore_checkpoint as restore_checkpoint
from .training import save_checkpoint as save_checkpoint
# Probes and geometry
from .analysis import LinearProbe as LinearProbe
from .analysis import ProbeMetrics as ProbeMetrics
from .analysis import belief_centroids as belief_centroids
from .analysis import concat_sites as concat_sites
from .analysis import evaluate_probe as evaluate_probe
from .analysis import fit_factor_probes as fit_factor_probes
from .analysis import fit_probe as fit_probe
from .analysis import probe_inverse as probe_inverse
from .analysis import probe_r2 as probe_r2
from .analysis import probe_rmse as probe_rmse
from .analysis import train_test_split as train_test_split
from .analysis import SubspaceAngles as SubspaceAngles
from .analysis import n_components_for_variance as n_components_for_variance
from .analysis import pca_explained_variance as pca_explained_variance
from .analysis import subspace_angles as subspace_angles
# Steering
from .analysis import FactorCentroids as FactorCentroids
from .analysis import ablate_direction as ablate_direction
from .analysis import add_vector as add_vector
from .analysis import belief_state_delta as belief_state_delta
from .analysis import centroid_vector as centroid_vector
from .analysis import difference_in_means as difference_in_means
from .analysis import factor_centroids as factor_centroids
from .analysis import label_means as label_means
from .analysis import position_mask_at as position_mask_at
from .analysis import set_projection as set_projection
from .analysis import steer_ablate as steer_ablate
from .analysis import steer_add as steer_add
from .analysis import steer_set_projection as steer_set_projection
from .analysis import steering_sweep as steering_sweep
from .analysis import SteeringKLs as SteeringKLs
from .analysis import SteeringSweep as SteeringSweep
from .analysis import evaluate_steering as evaluate_steering
from .analysis import STEERING_METHODS as STEERING_METHODS
from .analysis import SteeringMethod as SteeringMethod
from .analysis import belief_sector as belief_sector
from .analysis import factor_swap_symmetric as factor_swap_symmetric
from .analysis import steering_vectors as steering_vectors
from .analysis import synchronized_classes as synchronized_classes
from .analysis import factor_token_marginals as factor_token_marginals
from .analysis import kl_divergence as kl_divergence
from .analysis import sector_token_classes as sector_token_classes
from .analysis import specificity_ratio as specificity_ratio
from .analysis import steering_kls as steering_kls
from .analysis import token_class_masses as token_class_masses
# Sweeps
from .sweep import Grid as Grid
from .sweep import SweepResult as SweepResult
from .sweep import grid as grid
from .sweep import load_sweep as load_sweep
from .sweep import points as points
from .sweep import run_sweep as run_sweep
