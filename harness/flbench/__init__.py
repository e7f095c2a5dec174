"""The federated benchmark: simulated clinics, the methods compared on them, results, plots, `bench fl`."""
