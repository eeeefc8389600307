"""Quantized weights: which scheme a checkpoint or `--quantization` asks for (`config`), how each checkpoint
format is repacked into the device layouts of `kernels.quant_reference` (`formats`, `loading`), and the
modules that keep the packed buffers and compute their products through the ops table (`layers`)."""
