"""Shared fixture for the device tests: a real export folder made with TensorFlow's own converter.

Until export.tflite writes its folders, the device layer is tested on a stand-in with the same layout
(devices/bundle.py documents it): a small Keras CNN trained for a few seconds on real CIFAR-10 images,
full-integer quantized by `TFLiteConverter` (representative dataset of real images, int8 input and output),
plus its fp32 twin. The "expected outputs" the device is checked against are what LiteRT's reference
kernels (`OpResolverType.BUILTIN_REF`) compute for the int8 model: a legitimate stand-in for the
fake-quant sim, since the sim is what the reference kernels match bit for bit (EXPORT-NOTES.md).
This module holds no tests; the builders are cached so every test module shares one export.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

NAME = "kcnn"
N_EVAL = 1000


def _keras_model(batch_size: int | None):
    import keras
    from keras import layers

    x = inp = keras.Input((32, 32, 3), batch_size=batch_size)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(48, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    y = layers.Conv2D(48, 1, activation="relu")(x)
    x = layers.Add()([x, y])
    x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(10)(x)
    return keras.Model(inp, out)


def _normalize(images: np.ndarray) -> np.ndarray:
    from ghnq.data import MEAN, STD

    return ((images.astype(np.float32) / 255.0 - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def _reference_outputs(model_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Expected codes in the arithmetic the device runs (LiteRT's default XNNPACK delegate), as the exporters'
    bundles carry (their xnnpack-rounding sim). The reference kernels round differently by up to 1 step, which
    flipped 1-1.2 % of top-1 decisions of this Keras fixture: whether it passed the 99 % bar depended on how
    the 2-epoch Keras training happened to land."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_path), num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    outs = []
    for x in inputs:
        it.set_tensor(i, x[None])
        it.invoke()
        outs.append(it.get_tensor(o)[0].copy())
    return np.stack(outs)


@functools.cache
def export_dir() -> Path:
    """A folder laid out like `out/<name>/` from the exporter (built once per test session)."""
    import tensorflow as tf

    from ghnq.data import load_eval_images

    images, labels, _ = load_eval_images(None, quiet=True)
    n_eval = min(N_EVAL, len(labels) // 2)
    eval_x, eval_y = images[:n_eval], labels[:n_eval]
    train_x, train_y = _normalize(images[n_eval:n_eval + 3000]), labels[n_eval:n_eval + 3000]

    import keras

    keras.utils.set_random_seed(0)
    trainable = _keras_model(None)
    trainable.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainable.fit(train_x, train_y, epochs=2, batch_size=64, verbose=0)
    model = _keras_model(1)  # the deployed shape: batch 1, same weights
    model.set_weights(trainable.get_weights())

    root = Path(tempfile.mkdtemp(prefix="ghnq-devices-export-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = root / NAME
    (out / "verify").mkdir(parents=True)

    calib = train_x[:200]
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (out / f"{NAME}_fp32.tflite").write_bytes(conv.convert())
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x[None]] for x in calib)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    int8_path = out / f"{NAME}_int8.tflite"
    int8_path.write_bytes(conv.convert())

    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(int8_path))
    (s_in, z_in), (s_out, z_out) = (it.get_input_details()[0]["quantization"],
                                    it.get_output_details()[0]["quantization"])
    inputs = np.clip(np.round(_normalize(eval_x) / s_in) + z_in, -128, 127).astype(np.int8)
    expected = _reference_outputs(int8_path, inputs)
    np.save(out / "verify" / "inputs_int8.npy", inputs)
    np.save(out / "verify" / "expected_int8.npy", expected)
    np.save(out / "verify" / "labels.npy", eval_y.astype(np.int64))
    float_logits = trainable.predict(_normalize(eval_x), verbose=0)
    acc_sim = float(np.mean(expected.argmax(1) == eval_y))
    report = {"artifact": f"{NAME}_int8.tflite", "images": int(n_eval), "top1_agreement": 1.0,
              "max_step_error": 0, "p99_step_error": 0.0, "accuracy_artifact": acc_sim,
              "accuracy_sim": acc_sim, "accuracy_float": float(np.mean(float_logits.argmax(1) == eval_y)),
              "weights": "keras fixture (tests/test_devices_common.py)",
              "quantization": {"input": {"scale": float(s_in), "zero_point": int(z_in)},
                               "output": {"scale": float(s_out), "zero_point": int(z_out)}}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return out


def copy_export(dest: Path) -> Path:
    """A private copy of the export folder (tests that write or tamper must not share one)."""
    return Path(shutil.copytree(export_dir(), dest))
