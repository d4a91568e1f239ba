"""Triton kernels. Importing a submodule imports triton: only ``streamtrain.ops.<op>``
dispatchers do that, lazily, when a Triton kernel is asked for."""
