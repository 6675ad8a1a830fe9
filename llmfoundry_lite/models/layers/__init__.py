"""MPT building blocks; importing this package registers the attention kernels, norms, FFNs and
init functions under the names the model config uses."""
from llmfoundry_lite.models.layers import attention, ffn, init, norms  # noqa: F401
