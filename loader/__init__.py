"""atlasflow.loader"""
