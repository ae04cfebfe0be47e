"""The vllm backend: the steering API on a vLLM engine, every request carrying its own interventions.

* ``model.py``: the driver, ``VLLMModel`` and ``load_vllm`` (rows and ``Intervention`` objects -> request records,
  one engine call, captures read back);
* ``wire.py``: what travels between driver and engine: typed request records (``RequestSpec``, ``SteerItem``) and
  their msgpack-safe form, packed vectors, the steering digests of prefix-cache blocks;
* ``scheduler.py``: the scheduler patch that adds those digests to vLLM's block hashes;
* ``plugin.py``: the ``vllm.general_plugins`` entry point that installs the patch in every vLLM process;
* ``worker.py``: the worker extension that drives one ``Plan`` per step of vLLM's flattened batches;
* ``compat.py``: every private vLLM name and attribute the others use, and the supported vLLM range.

vLLM is imported only inside functions: importing this package never needs vLLM.
"""

from steering.backends.vllm.model import EngineStartError, VLLMModel, load_vllm

__all__ = ["EngineStartError", "VLLMModel", "load_vllm"]
