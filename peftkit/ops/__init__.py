"""Operations on stored adapters: conversion, combination, merging, export, model cards, validation."""
