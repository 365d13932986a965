class QuantError(Exception):
    """Every error of ``gptoss_vllm.quant``: tensors that are not the MXFP4 format they claim."""
