# Per-board Arm architecture for llama.cpp's CPU kernels (scripts/build-static --build).
# llama-cpp-sys-2's build script passes every CMAKE_* and GGML_* environment variable to CMake
# (and rebuilds when a GGML_* one changes), then forces -DGGML_CPU_ARM_ARCH=armv8-a on aarch64
# Linux, which drops the dot-product kernels. This file is given as CMAKE_PROJECT_INCLUDE, so
# it runs after each project() call: a normal variable set here shadows that cache entry in
# every directory below (policy CMP0126, NEW under llama.cpp's cmake_minimum_required(...3.28),
# keeps it through ggml's set(... CACHE ...)).
#   GGML_EDGEACT_ARM_ARCH   e.g. armv8.2-a+dotprod+fp16
#   GGML_EDGEACT_ARM_TUNE   e.g. cortex-a76 (-mtune)
if(GGML_EDGEACT_ARM_ARCH)
  set(GGML_CPU_ARM_ARCH "${GGML_EDGEACT_ARM_ARCH}")
  message(STATUS "edgeact: GGML_CPU_ARM_ARCH=${GGML_CPU_ARM_ARCH} (scripts/cmake/arm-arch.cmake)")
endif()
if(GGML_EDGEACT_ARM_TUNE)
  add_compile_options("-mtune=${GGML_EDGEACT_ARM_TUNE}")
endif()
