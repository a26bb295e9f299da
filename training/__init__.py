"""The offline retraining loop. Imports bot/, never the other way round."""
