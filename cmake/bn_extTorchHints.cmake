# Hints that let torch's CMake config find CUDA pieces for a CUDA build of the
# torch pip package on a machine where `nvcc` may be a wrapper script and
# nvrtc comes from pip's nvidia-* packages. Harmless for CPU builds of torch.
if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR AND NOT DEFINED ENV{CUDA_HOME})
  find_program(BN_EXT_NVCC nvcc)
  if(BN_EXT_NVCC)
    # nvcc's dry run names the real toolkit folder (TOP=...).
    execute_process(COMMAND "${BN_EXT_NVCC}" --dryrun -x cu -E /dev/null
                    OUTPUT_VARIABLE _bn_ext_out ERROR_VARIABLE _bn_ext_err)
    string(REGEX MATCH "TOP=([^\r\n]+)" _bn_ext_top "${_bn_ext_out}${_bn_ext_err}")
    if(CMAKE_MATCH_1)
      get_filename_component(_bn_ext_root "${CMAKE_MATCH_1}" REALPATH)
      if(EXISTS "${_bn_ext_root}/include/cuda_runtime.h")
        set(CUDA_TOOLKIT_ROOT_DIR "${_bn_ext_root}" CACHE PATH "CUDA toolkit root")
      endif()
    endif()
  endif()
elseif(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
  set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}" CACHE PATH "CUDA toolkit root")
endif()

if(NOT CUDA_nvrtc_LIBRARY)
  set(_bn_ext_hints)
  foreach(_prefix IN LISTS CMAKE_PREFIX_PATH)
    file(GLOB _dirs "${_prefix}/../../../nvidia/*/lib")
    list(APPEND _bn_ext_hints ${_dirs})
  endforeach()
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS ${_bn_ext_hints} "${CUDA_TOOLKIT_ROOT_DIR}/lib64")
endif()

# Same default CUDA architectures as setup.py.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
