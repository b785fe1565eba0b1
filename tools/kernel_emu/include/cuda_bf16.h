// Host stand-in for <cuda_bf16.h> used by the kernel emulator (tools/kernel_emu): pulls in the
// whole CUDA shim so kernels/*.cu compile with g++.
#pragma once
#include "../cuda_emu.h"
