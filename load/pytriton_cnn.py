"""PyTriton serving a SavedModel's "serving_default" (images -> probabilities) with TensorFlow, for
load/workers.py. Run with the Python of PyTriton's own venv (nvidia-pytriton==0.7.0):

    python load/pytriton_cnn.py SAVED_MODEL HTTP_PORT    # HTTP_PORT, +1 (gRPC) and +2 (metrics)

Triton's dynamic batcher merges requests up to 64 rows, as Kiln's largest bucket."""

from __future__ import annotations

import sys


def main(saved_model: str, http_port: int) -> None:
    import numpy as np
    import tensorflow as tf
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    serving = tf.saved_model.load(saved_model).signatures["serving_default"]

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        return {"probabilities": serving(images=tf.constant(images))["probabilities"].numpy()}

    config = TritonConfig(http_port=http_port, grpc_port=http_port + 1, metrics_port=http_port + 2)
    with Triton(config=config) as triton:
        triton.bind(model_name="cnn32", infer_func=infer,
                    inputs=[Tensor(name="images", dtype=np.float32, shape=(32, 32, 3))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(10,))],
                    config=ModelConfig(max_batch_size=64, batcher=DynamicBatcher()))
        triton.serve()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
