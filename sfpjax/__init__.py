"""sfpjax: generalized hidden Markov processes, exact belief states and small transformers in JAX."""

from ._ghmm import GHMM as GHMM
from ._ghmm import is_hmm as is_hmm
from ._ghmm import stationary_state as stationary_state
from ._ghmm import validate_ghmm as validate_ghmm
