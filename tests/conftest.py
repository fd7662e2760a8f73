import os

import torch

# Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present. The
# variable is read when triton is imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
