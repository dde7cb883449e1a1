"""The Equinox decoder-only transformer with named activation sites, and interventions as values."""

from ._transformer import Transformer as Transformer
from ._transformer import TransformerBlock as TransformerBlock
from ._transformer import TransformerConfig as TransformerConfig
from ._interventions import Intervention as Intervention
from ._generate import Rollout as Rollout
from ._generate import completion_log_probs as completion_log_probs
from ._generate import generate as generate
from ._generate import sample_completions as sample_completions
from ._lora import LoRAAdapter as LoRAAdapter
from ._lora import LoRATransformer as LoRATransformer
from ._lora import lora_target_names as lora_target_names
from ._steered import SteeredTransformer as SteeredTransformer
