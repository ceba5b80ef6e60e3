"""swallow-titan: continual pre-training of Llama-3.1 on torchtitan.

Importing this package first selects the device torchtitan will use (CPU when no
GPU is present, see :mod:`swallow_titan.runtime.seams`), so it must be imported before
``torchtitan``.
"""

from swallow_titan.runtime.seams import select_device

DEVICE_TYPE = select_device()

__version__ = "0.1.0"
