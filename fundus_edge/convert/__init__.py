"""Export: a chain of steps from a checkpoint (or an exported FP32 ONNX) to deployable artifacts.

* :mod:`~fundus_edge.convert.steps` - the steps (checkpoint -> ONNX -> FP16 / INT8 -> engine /
  Triton), each taking one artifact and returning the next with its own checks;
* :mod:`~fundus_edge.convert.chain` - plans the steps for ``fundus-edge export`` and reports;
* :mod:`~fundus_edge.convert.export_config` - its options and the shipped profiles;
* :mod:`~fundus_edge.convert.staging` - build in a hidden folder, swap in at the end;
* file-level converters: :mod:`~fundus_edge.convert.onnx_export` (trace, fold, simplify),
  :mod:`~fundus_edge.convert.quantize` (FP16, INT8 Q/DQ), :mod:`~fundus_edge.convert.tensorrt`
  (engines), :mod:`~fundus_edge.convert.triton` (model repositories);
* checks: :mod:`~fundus_edge.convert.verify` (parity), :mod:`~fundus_edge.convert.hygiene`
  (graph hygiene, TensorRT operators), :mod:`~fundus_edge.convert.calibration` (images).

Nothing is imported here: PyTorch, ONNX and TensorRT load where a step needs them.
"""
