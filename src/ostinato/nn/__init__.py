"""Neural network building blocks (convolutions, SEANet, vector quantization, codecs)."""
