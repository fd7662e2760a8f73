"""Public ops: torch.library custom ops with fake implementations and sparse autograd."""
from tckernels.ops.scatter_matmul import scatter_matmul
from tckernels.ops.gather_matmul import gather_matmul
from tckernels.ops.gather_dot import gather_dot
from tckernels.ops.topk_relu import topk_relu
from tckernels.ops.encode_topk import encode_topk
from tckernels.ops.encode_relu import encode_relu
from tckernels.ops.sparse_decode import sparse_decode

__all__ = ["topk_relu", "encode_topk", "encode_relu", "sparse_decode", "gather_matmul", "gather_dot", "scatter_matmul"]
