"""ComfyUI custom-node entry of deis_fast: copy this folder to ComfyUI/custom_nodes/deis_fast (or run
``python -m deis_fast.integrations.comfyui install /path/to/ComfyUI``, which writes the same loader there).
deis_fast itself must be installed in ComfyUI's Python (``pip install deis_fast`` or ``pip install -e <repo>``)."""
try:
    from deis_fast.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register
except ImportError as e:  # say what to do in the console ComfyUI prints import failures to
    raise ImportError(f"the deis_fast ComfyUI nodes need the deis_fast package in ComfyUI's Python environment: "
                      f"pip install deis_fast (or pip install -e /path/to/the/deis_fast/repo) ({e})") from e

register()  # deis_fast_* samplers and schedulers on the plain KSampler lists
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
