"""Public ops of groupvit_fast: one function per op, backend chosen in ``ops.dispatch``."""
from .dispatch import (available_backends, get_backend, gumbel_assign_merge,  # noqa: F401
                       last_backend, last_call)
from .reference import gumbel_assign_merge_reference  # noqa: F401
