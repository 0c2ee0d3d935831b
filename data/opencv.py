"""OpenCV for the data package, single-threaded in every process that imports it.

OpenCV's own thread pool (its pthreads backend here) does not survive ``fork()``: a DataLoader worker, or a
generation process of ``data.synthetic``, forked from a parent whose pool is running can wait for ever on a lock it
inherited (seen in the test suite: a DataLoader worker hung in ``cv2.warpAffine``). The work per call is one image
of a few hundred pixels, and the parallelism is the worker processes': OpenCV's threads only competed with them
and with torch's for the same cores (a 96-px resize and normalisation took the same 0.83-0.87 ms single-threaded).
Importing this module sets OpenCV single-threaded for the whole process; every module of ``data`` takes ``cv2``
from here.
"""

from __future__ import annotations

import cv2

cv2.setNumThreads(0)  # 0: no thread pool at all (OpenCV runs every function in the calling thread)

__all__ = ["cv2"]
