# Finds the external libraries and wraps each in a target of ours (dsv3::<name>), so the rest of the
# build never depends on how a distribution packaged them.

find_package(MPI REQUIRED COMPONENTS CXX)
find_package(yaml-cpp REQUIRED)
find_package(GTest REQUIRED)
find_package(nlohmann_json 3 REQUIRED)

# CBLAS: OpenBLAS first (Debian's libopenblas-dev), any CBLAS otherwise.
find_path(DSV3_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas REQUIRED)
find_library(DSV3_CBLAS_LIBRARY NAMES openblas cblas blas REQUIRED)
add_library(dsv3_cblas INTERFACE)
target_include_directories(dsv3_cblas SYSTEM INTERFACE ${DSV3_CBLAS_INCLUDE})
target_link_libraries(dsv3_cblas INTERFACE ${DSV3_CBLAS_LIBRARY})
add_library(dsv3::cblas ALIAS dsv3_cblas)

# Parallel HDF5 (hdf5-openmpi). Debian installs it beside the serial one; ask for the MPI flavour.
set(HDF5_PREFER_PARALLEL TRUE)
find_package(HDF5 REQUIRED COMPONENTS C)
if(NOT HDF5_IS_PARALLEL)
  message(FATAL_ERROR "dsv3 needs parallel HDF5 (Debian: libhdf5-openmpi-dev); found a serial one: ${HDF5_C_INCLUDE_DIRS}")
endif()
add_library(dsv3_hdf5 INTERFACE)
target_include_directories(dsv3_hdf5 SYSTEM INTERFACE ${HDF5_C_INCLUDE_DIRS})
target_link_libraries(dsv3_hdf5 INTERFACE ${HDF5_C_LIBRARIES} MPI::MPI_CXX)
target_compile_definitions(dsv3_hdf5 INTERFACE ${HDF5_C_DEFINITIONS})
add_library(dsv3::hdf5 ALIAS dsv3_hdf5)

# Kokkos. Debian's libtrilinos-kokkos-dev exports Kokkos::kokkos with an include directory that does
# not exist (/usr/lib/include) and a compile flag among its link items. We do not use that target:
# we locate Kokkos_Core.hpp from the package's own variables and link the core library directly.
if(DSV3_ENABLE_KOKKOS)
  find_package(Kokkos REQUIRED)
  find_path(DSV3_KOKKOS_INCLUDE Kokkos_Core.hpp
    HINTS ${Kokkos_INCLUDE_DIRS} ${KokkosCore_INCLUDE_DIRS}
    PATH_SUFFIXES trilinos REQUIRED)
  if(TARGET trilinos_kokkoscore)
    set(_dsv3_kokkos_libs trilinos_kokkoscore)
  else()
    set(_dsv3_kokkos_libs ${Kokkos_LIBRARIES})
  endif()
  add_library(dsv3_kokkos INTERFACE)
  target_include_directories(dsv3_kokkos SYSTEM INTERFACE ${DSV3_KOKKOS_INCLUDE})
  target_link_libraries(dsv3_kokkos INTERFACE ${_dsv3_kokkos_libs})
  target_compile_definitions(dsv3_kokkos INTERFACE DSV3_HAVE_KOKKOS=1)
  add_library(dsv3::kokkos ALIAS dsv3_kokkos)
  message(STATUS "dsv3: Kokkos ${Kokkos_VERSION} headers in ${DSV3_KOKKOS_INCLUDE}")
endif()

# CUDA backend: nvcc, cuBLAS and NCCL from the CUDA toolkit (default /usr/local/cuda).
if(DSV3_ENABLE_CUDA)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)  # Hopper (H100/H200); override with -DCMAKE_CUDA_ARCHITECTURES=...
  endif()
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  find_path(DSV3_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include REQUIRED)
  find_library(DSV3_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64 REQUIRED)
  add_library(dsv3_nccl INTERFACE)
  target_include_directories(dsv3_nccl SYSTEM INTERFACE ${DSV3_NCCL_INCLUDE})
  target_link_libraries(dsv3_nccl INTERFACE ${DSV3_NCCL_LIBRARY})
  add_library(dsv3::nccl ALIAS dsv3_nccl)
  message(STATUS "dsv3: CUDA ${CUDAToolkit_VERSION}, NCCL ${DSV3_NCCL_LIBRARY}, archs ${CMAKE_CUDA_ARCHITECTURES}")
endif()
