"""Tests of how fedclinic installs."""
