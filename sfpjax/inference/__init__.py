"""Exact inference on a GHMM: belief filtering, next-token laws, the mixed-state presentation, myopic entropies and sampling."""

from ._filter import FilterResult as FilterResult
from ._filter import belief_update as belief_update
from ._filter import beliefs_with_initial as beliefs_with_initial
from ._filter import filter_beliefs as filter_beliefs
from ._filter import filter_beliefs_reference as filter_beliefs_reference
from ._filter import next_token_probs as next_token_probs
from ._filter import replicate as replicate
from ._filter import sequence_log_prob as sequence_log_prob
from ._mixed_state import MixedStatePresentation as MixedStatePresentation
from ._mixed_state import belief_spread as belief_spread
from ._mixed_state import entropy_rate as entropy_rate
from ._mixed_state import mixed_state_presentation as mixed_state_presentation
from ._mixed_state import myopic_entropies as myopic_entropies
from ._mixed_state import num_distinct_beliefs as num_distinct_beliefs
from ._mixed_state import word_beliefs as word_beliefs
from ._sampling import sample as sample
from ._conditional import ConditionalFilterResult as ConditionalFilterResult
from ._conditional import filter_conditional as filter_conditional
from ._conditional import myopic_entropies_conditional as myopic_entropies_conditional
from ._conditional import sample_conditional as sample_conditional
