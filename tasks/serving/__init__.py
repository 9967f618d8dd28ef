"""Serving: engines (ONNX Runtime / PyTorch), batched cut-outs and the quality score."""
