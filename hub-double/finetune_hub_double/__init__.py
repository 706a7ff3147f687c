"""A local Hugging Face Hub-API test double, for tests and demos; not part of the product.

See `finetune_hub_double.server` for what it speaks and how to run it.
"""

from finetune_hub_double.server import HubDouble

__all__ = ["HubDouble"]
