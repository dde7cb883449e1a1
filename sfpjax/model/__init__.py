"""The Equinox decoder-only transformer with named activation sites, and interventions as values."""

from ._transformer import Transformer as Transformer
from ._transformer import TransformerBlock as TransformerBlock
from ._transformer import TransformerConfig as TransformerConfig
from ._interventions import Intervention as Intervention
