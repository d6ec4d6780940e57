# Two commands do all the set-up on a fresh machine:
#   make demo    the main job: environment + parity table (python -m twins_kernels)
#   make test    the test suite (tests/)
# Both create and reuse a virtual environment in .venv with torch, timm, triton and the package
# installed editable, with the CUDA extension built when a CUDA toolkit is found.
VENV        ?= .venv
PYTHON      := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
CUDA_HOME   ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
# pytest-xdist workers: the Triton interpreter runs a test on one core, so two workers use CI's two; a worker
# that runs out of tests takes some of the other's (worksteal), rather than idling while it ends its share
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal
export CUDA_HOME TORCH_CUDA_ARCH_LIST
# A machine with a toolkit must build the extension: its registration test fails instead of skipping.
REQUIRE_EXTENSION := $(if $(CUDA_HOME),1,0)

.PHONY: demo test bench kernel-report sweep-report extension gpu-versions gpu-versions-venv clean

$(VENV)/.installed: Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)" ninja timm pytest pytest-benchmark pytest-xdist hypothesis matplotlib
	touch $@

# the package, installed editable, and the extension rebuilt whenever a source under csrc/ changes
$(VENV)/.extension: $(VENV)/.installed setup.py $(wildcard csrc/*)
	$(MAKE) extension
	touch $@

extension:
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

demo: $(VENV)/.extension
	$(PYTHON) -m twins_kernels

test: $(VENV)/.extension
	TWINS_KERNELS_REQUIRE_EXTENSION=$(REQUIRE_EXTENSION) $(PYTHON) -m pytest tests/ -q $(XDIST)

bench: $(VENV)/.extension
	$(PYTHON) -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/latest.json

# Every Triton kernel compiled for sm_90 and sm_80 without a GPU: shared memory, registers, spills, MMA
kernel-report: $(VENV)/.extension
	env -u TRITON_INTERPRET $(PYTHON) tests/triton_aot.py --arch 90 --arch 80 \
		--json benchmarks/results/triton_kernels.json --markdown benchmarks/results/triton_kernels.md

# The GPU machine's versions (the device tool's KINDS.md: Python 3.12, torch 2.11.0+cu130, triton 3.6.0): the
# extension must compile against that torch's headers (its sm_90 kernels must fit their launches:
# test_cuda_resources.py), the package must work with it and every Triton kernel must compile with that Triton
# (triton_aot.py --quick, sm_90; a process per dtype, minutes of a core each with a cold cache), or a GPU
# session loses its device time to a build error. Built and tested in a copy of the tree, with arch 9.0 only
# (the H100), so the .venv build stays as it is.
# The GPU machine's timm version is not recorded: this leg takes the oldest timm 1.0 release (setup.py's
# floor, as torch 2.11 is), the main suite the newest.
GPU_VERSIONS_SPEC ?= torch==2.11.0 torchvision==0.26.0 timm==1.0.3
# (a pyenv shim for 3.12 may be on PATH without being active, hence the fallbacks)
GPU_VERSIONS_PYTHON ?= $(shell (python3.12 -c 'import sys; print(sys.executable)' || ls $(HOME)/.pyenv/versions/3.12*/bin/python3.12 || echo python3) 2>/dev/null | head -1)
GPU_VERSIONS_VENV ?= .venv-gpu-versions
GPU_VERSIONS_TREE := build/gpu-versions
# Left out there: the parity sweeps over shapes, the same kernels at more sizes (the main suite runs them).
# What other versions break is how the package meets torch and Triton: registration, the extension,
# torch.compile, each kernel launched at all (the rest of those files and the main job's parity table).
GPU_VERSIONS_SWEEPS := test_lsa.py::test_triton_matches_timm test_lsa.py::test_triton_mask_mode_matches_mmseg \
	test_gsa.py::test_triton_matches_timm test_peg.py::test_triton_matches_timm
# Patching meets timm's API (its classes, FX tracing, features_only, forward_intermediates) on these; the
# model parity tests in the Triton interpreter stay in the main suite.
GPU_VERSIONS_PATCH_TESTS := test_replaces_every_module_and_keeps_the_state_dict test_checkpoints_load_both_ways \
	test_model_parity_every_variant_reference_backend test_features_only_backbone_and_wrappers \
	test_fx_feature_extraction_of_a_patched_model test_fused_modules_have_every_attribute_of_timms

$(GPU_VERSIONS_VENV)/.installed: Makefile
	$(GPU_VERSIONS_PYTHON) -m venv $(GPU_VERSIONS_VENV)
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VERSIONS_VENV)/bin/python -m pip install --quiet $(GPU_VERSIONS_SPEC) wheel ninja pytest pytest-xdist hypothesis
	touch $@

# the environment alone (.ci/run installs it while `make test` runs)
gpu-versions-venv: $(GPU_VERSIONS_VENV)/.installed

gpu-versions: $(GPU_VERSIONS_VENV)/.installed
	rm -rf $(GPU_VERSIONS_TREE) && mkdir -p $(GPU_VERSIONS_TREE)
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(GPU_VERSIONS_TREE)
	cd $(GPU_VERSIONS_TREE) && TORCH_CUDA_ARCH_LIST=9.0 $(abspath $(GPU_VERSIONS_VENV))/bin/python -m pip install \
		--quiet --no-build-isolation -e .
	cd $(GPU_VERSIONS_TREE) && bash benchmarks/run_gpu.sh sources-hash > twins_kernels/_C.sources.sha256
	cd $(GPU_VERSIONS_TREE) && TWINS_KERNELS_REQUIRE_EXTENSION=$(REQUIRE_EXTENSION) \
		$(abspath $(GPU_VERSIONS_VENV))/bin/python -m pytest tests/test_backend.py tests/test_lsa.py tests/test_gsa.py \
		tests/test_peg.py tests/test_cuda_resources.py $(GPU_VERSIONS_PATCH_TESTS:%=tests/test_patch.py::%) \
		$(GPU_VERSIONS_SWEEPS:%=--deselect tests/%) \
		-q $(XDIST) -p no:cacheprovider
	cd $(GPU_VERSIONS_TREE) && env -u TRITON_INTERPRET $(abspath $(GPU_VERSIONS_VENV))/bin/python tests/triton_aot.py \
		--quick --arch 90 --jobs 3

# The tile sweep's candidates (benchmarks/sweep_tiles.py) compiled for sm_90 with the GPU machine's Triton
# (registers, spills, shared memory): the GPU sweep skips those that spill (run_gpu.sh sweep)
sweep-report: $(GPU_VERSIONS_VENV)/.installed
	env -u TRITON_INTERPRET PYTHONPATH=$(CURDIR) $(GPU_VERSIONS_VENV)/bin/python tests/triton_aot.py --sweeps \
		--arch 90 --json benchmarks/results/sweep_static.json --markdown benchmarks/results/sweep_static.md

clean:
	rm -rf $(VENV) $(GPU_VERSIONS_VENV) build *.egg-info twins_kernels/_C*.so
