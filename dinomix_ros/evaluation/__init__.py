"""Evaluation: how good a map is, and which similarity threshold the live node should use.

* :mod:`~dinomix_ros.evaluation.retrieval`: geometric positives within a radius, Recall@N;
* :mod:`~dinomix_ros.evaluation.curves`: precision/recall of the best match, thresholds for a target precision;
* :mod:`~dinomix_ros.evaluation.loops`: RTAB-Map ground truth, loop closure and relocalization;
* :mod:`~dinomix_ros.evaluation.plots`: the PNG plots (matplotlib, imported lazily);
* :mod:`~dinomix_ros.evaluation.runs_folders`, :mod:`~dinomix_ros.evaluation.runs_bag` and
  :mod:`~dinomix_ros.evaluation.runs_loop_closure`: the three setups of ``dinomix map eval`` as library calls;
  :mod:`~dinomix_ros.evaluation.runs`: what they share, and the run folder;
* :mod:`~dinomix_ros.evaluation.posed_pairs`: pose accuracy of geometric verification on posed image pairs (rotation
  and translation errors, NEES of the published covariance); :mod:`~dinomix_ros.evaluation.warped_pairs` renders
  the known-motion views;
* :mod:`~dinomix_ros.evaluation.reports` and :mod:`~dinomix_ros.evaluation.calibration`: the run folder, and the
  calibrated threshold stored in a map;
* :mod:`~dinomix_ros.evaluation.pose_graph`: loop closures in a GTSAM pose graph (gtsam imported lazily),
  :mod:`~dinomix_ros.evaluation.synthetic_sequence`: an RGB-D sequence rendered from photos with exact ground truth,
  :mod:`~dinomix_ros.evaluation.runs_pose_graph`: the chain from frames to an optimized trajectory.

Input checks and the error every function raises for bad input: :mod:`~dinomix_ros.evaluation.inputs`.
"""
