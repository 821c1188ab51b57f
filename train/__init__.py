"""atlasflow.train"""
