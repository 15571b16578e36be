"""Audio in: decode (soundfile), mix to mono, resample (scipy ``resample_poly``), and data sets.

Data sets are read into :class:`AudioRecord` s (id, audio source, transcript, word timings if
the data has them, speaker, split, pass-through columns) from

* a folder of audio files with same-stem transcripts (``.txt``/``.lab``) and optional word
  timings (``.TextGrid`` word tier, or slamkit ``.json`` with ``aligned_text``);
* a JSONL or CSV manifest with audio paths (relative to the manifest);
* a Parquet file (or folder of them), a ``datasets.Dataset``, or a ``save_to_disk`` folder, with
  audio stored as bytes / ``{"bytes", "path"}`` structs / ``{"array", "sampling_rate"}``, one or
  several renderings per row (the Common-Sense-Facts-Audio layout: prompt text, audio renderings,
  word timings per rendering, correct and counterfactual completions).

Column names are configurable with :class:`Columns` (``Columns.parse("text=prompt,audio=a|b")``).
Every error names the file, row or column. soundfile, scipy, pyarrow and datasets are imported
lazily: ``pip install 'speech-lens[audio]'``.
"""
