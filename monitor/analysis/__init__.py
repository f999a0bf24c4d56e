"""The analysis core: records → signals → detectors against a calibrated baseline → alarms.

``signals`` (validate records, extract signal families) → ``baseline`` (fit detectors on reference
traffic, file format) with ``calibration`` (thresholds from a false-alarm budget) → ``analyzer``
(the streaming windows, evaluation, alarms, attribution). One detector per module in ``detectors/``.
"""
