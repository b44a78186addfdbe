"""The study's ensemble as a servable model: the files it is made of (`artifacts`), its registration in MLflow
(`register`), the predictor that loads them (`predictor`) and MLflow's pyfunc adapter. Above training (it builds
the models), ensembles (it applies them) and tracking (it registers through the tracker)."""
