"""The networks: pure flax.linen modules, NHWC, one file per network (vae, clip, unet; shared layers)."""
