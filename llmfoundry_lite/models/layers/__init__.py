"""MPT building blocks: attention kernels, norms, FFNs and init functions, each registered by name
where it is defined (see `llmfoundry_lite.registry`)."""
