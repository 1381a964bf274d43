"""MVFA's machinery, below the four scripts: configs and precision, scoring, metrics, evaluation, the
protocols' data, training and resume, records and anomaly-map pictures. CLIP/ and dataset/ are beneath it;
nothing here reads the command line."""
