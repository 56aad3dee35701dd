"""The phone-side update codec: a sequence of small steps, each in its own module.

clip.py      norm clipping (DP sensitivity)
noise.py     local DP noise (Gaussian, Laplace)
sparsify.py  top-k / rand-k
feedback.py  error feedback (residual kept on the phone)
quantize.py  stochastic uniform quantization and tensor encodings
encoder.py   UpdateEncoder: assembles the steps from EncoderConfig
"""

from fedfleet.protocol.codec.config import EncoderConfig
from fedfleet.protocol.codec.encoder import UpdateEncoder, dense_float32_nbytes

__all__ = ["EncoderConfig", "UpdateEncoder", "dense_float32_nbytes"]
