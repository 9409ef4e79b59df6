-- Orthanc auto-routing: forward chest radiographs (CR/DX) to the CXR node as soon as they are
-- stored, but never the node's own results (SR / Encapsulated PDF / Secondary Capture it sent back).
local NODE = 'CXRNODE'           -- key in DicomModalities
local NODE_AET = 'CXRNODE'       -- the node's calling AE title when it sends results back

function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin ~= nil and origin['RemoteAet'] == NODE_AET then
      return
   end
   local modality = tags['Modality']
   if modality == 'CR' or modality == 'DX' then
      SendToModality(instanceId, NODE)
   end
end
