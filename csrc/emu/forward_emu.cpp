// csrc/cuda/forward.cu, compiled as host C++ for the emulated CUDA backend (cuda_emu.h).
#include "../cuda/forward.cu"
