"""Floor 5: a trained model measured and used.

`evaluate` (the evaluate stages' reports: metrics, intervals, error split, plot tables,
figures, records), `inference` (a model file on anyone's photos: predict's detector).
"""
