"""SEANet blocks, quantizer, discriminator, losses and signal building blocks of the codec."""
