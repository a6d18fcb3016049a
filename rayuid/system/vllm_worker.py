"""What rayuid adds inside vLLM's worker processes: the ``worker_extension_cls`` and its weight-transfer backends.

vLLM imports this module in every worker it starts (``worker_extension_cls`` names it): in the engine's own process
for an in-process engine, and in each tensor-parallel worker process otherwise. Importing it registers rayuid's
weight-transfer backends with vLLM's factory there, so a worker of any layout can build them (the driver never
imports this module: it imports vLLM).
"""

from __future__ import annotations

from rayuid.system import transfer_backends

transfer_backends.register()


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); reached with ``llm.collective_rpc``."""

    def rayuid_load_tensors(self, named: list) -> int:
        """In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0): (name, tensor view) pairs, no copy on the way."""
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        return len(named)

    def rayuid_received(self) -> str:
        """The fingerprint of what the last collective publish delivered (``rayuid.system.transport``)."""
        return self.weight_transfer_engine.received

    def rayuid_end_open_update(self) -> bool:
        """End a weight-update session a failed publish left open (``rayuid.system.engine``); True if one was.
        vLLM's finish puts back the weights it served into every layer that received nothing; layers that received
        part of the failed version are overwritten by the reload that follows (the store path)."""
        if not getattr(self, "_weight_update_active", False):
            return False
        try:
            self.finish_weight_update()
        finally:
            self._weight_update_active = False
        return True

    def rayuid_load_packed(self, data: bytes) -> int:
        """Engines in their own process: tensors cannot cross collective_rpc, so they come as safetensors bytes."""
        from safetensors.torch import load

        return self.rayuid_load_tensors(list(load(bytes(data)).items()))
