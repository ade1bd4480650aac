"""The RMSIN network (multi-modal Swin backbone with PWAM fusion, intra-scale and cross-scale interaction,
rotated-convolution decoder), its official-weight loading, and `build.build_model` from the flags."""
